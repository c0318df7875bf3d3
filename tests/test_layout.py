"""House rules that a parser can check: Ray only at the edges, data flows shards -> pretrain -> transfer."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY_EDGES = {"shards/cluster.py", "pretrain/run.py", "transfer/voc07.py"}


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out


def sources():
    for pkg in ("shards", "pretrain", "transfer"):
        yield from sorted((REPO / pkg).rglob("*.py"))


def test_ray_is_imported_only_at_the_edges():
    offenders = [str(p.relative_to(REPO)) for p in sources()
                 if "ray" in imports(p) and str(p.relative_to(REPO)) not in RAY_EDGES]
    assert offenders == []


def test_data_flows_one_way():
    for p in sources():
        got = imports(p)
        assert not got & {"infra", "scripts", "tests"}, p
        if not p.is_relative_to(REPO / "transfer"):
            assert "transfer" not in got, p  # nothing imports transfer; transfer may import pretrain
        if p.is_relative_to(REPO / "shards"):
            assert not got & {"pretrain", "transfer"}, p
