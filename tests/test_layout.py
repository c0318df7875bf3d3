"""House rules that a parser can check: Ray only at its edge and in the two drivers, `infra` under
everything, data flowing shards -> pretrain -> transfer."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY_EDGES = {"infra/ray_edge.py", "pretrain/run.py", "transfer/voc07.py"}
# what transfer may take from pretrain: the networks, their weights and inputs, checkpoints
TRANSFER_FROM_PRETRAIN = "pretrain.models"


def imports(path: Path, full: bool = False) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name if full else a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module if full else node.module.split(".")[0])
    return out


def sources(*pkgs):
    for pkg in pkgs or ("infra", "shards", "pretrain", "transfer"):
        yield from sorted((REPO / pkg).rglob("*.py"))


def test_ray_is_imported_only_at_its_edge_and_in_the_drivers():
    offenders = [str(p.relative_to(REPO)) for p in sources()
                 if "ray" in imports(p) and str(p.relative_to(REPO)) not in RAY_EDGES]
    assert offenders == []


def test_infra_imports_no_stage_package():
    for p in sources("infra"):
        assert not imports(p) & {"shards", "pretrain", "transfer", "scripts", "tests"}, p


def test_data_flows_one_way():
    for p in sources("shards", "pretrain", "transfer"):
        got = imports(p)
        assert not got & {"scripts", "tests"}, p
        if not p.is_relative_to(REPO / "transfer"):
            assert "transfer" not in got, p  # nothing imports transfer
        if p.is_relative_to(REPO / "shards"):
            assert not got & {"pretrain", "transfer"}, p


def test_transfer_takes_only_models_and_weights_from_pretrain():
    for p in sources("transfer"):
        bad = sorted(m for m in imports(p, full=True) if m.split(".")[0] == "pretrain"
                     and not (m == TRANSFER_FROM_PRETRAIN or m.startswith(TRANSFER_FROM_PRETRAIN + ".")))
        assert bad == [], f"{p.relative_to(REPO)} imports {bad}"
