"""What the generated detection set is made of: object instances and backgrounds from package photos.

Every source is a photo shipped inside scikit-image or scikit-learn (no download). Objects: cat <- chelsea's
head; person <- the astronaut; horse <- the horse silhouette filled with a recoloured fur texture;
pottedplant <- the dahlia of flower.jpg over a terracotta pot; tvmonitor <- a dark bezel around a crop of
the stereo motorcycle photo. Backgrounds are other photos. `instance` varies crop, aspect, flip, rotation
and colour per object; `background` crops, flips and tints. transfer/synthetic.py composes the scenes.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

_BACKGROUNDS = ("china", "coffee", "rocket", "brick", "grass", "gravel", "moon", "hubble_deep_field", "clock",
                "coins")



def _photo(name: str) -> Image.Image:
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image
        return Image.fromarray(load_sample_image(f"{name}.jpg"))
    import skimage.data
    arr = getattr(skimage.data, name)()
    return Image.fromarray(arr[0] if isinstance(arr, tuple) else arr).convert("RGB")


def _soft(mask: Image.Image, radius: float) -> Image.Image:
    """Feathered alpha: real object edges are never a hard step (pasted hard edges are a cue for free)."""
    return mask.filter(ImageFilter.GaussianBlur(radius))


@lru_cache(maxsize=1)
def _sources() -> dict:
    """Photos and fixed templates, loaded once: {name: PIL image or (RGB, L alpha) template}."""
    out = {"backgrounds": [_photo(n) for n in _BACKGROUNDS], "screen": _photo("stereo_motorcycle"),
           "fur": _photo("chelsea").convert("L").crop((140, 0, 340, 95))}  # the forehead, above the eyes
    cat = _photo("chelsea").crop((20, 0, 420, 300))  # the head, ears included; the blurred room cut off
    m = Image.new("L", cat.size)
    d = ImageDraw.Draw(m)
    d.ellipse((10, 25, 390, 315), fill=255)
    d.polygon([(15, 95), (40, 0), (130, 40)], fill=255)
    d.polygon([(270, 40), (360, 0), (385, 100)], fill=255)
    out["cat"] = (cat, _soft(m, 5))
    person = _photo("astronaut").crop((15, 10, 375, 512))  # x - 15, y - 10 below
    m = Image.new("L", person.size)
    d = ImageDraw.Draw(m)
    d.ellipse((130, 0, 296, 190), fill=255)  # hair and face
    d.ellipse((95, 130, 295, 280), fill=255)  # helmet ring
    hsv = np.asarray(person.convert("HSV"))
    # keep hair, skin and the ring; drop the grey studio backdrop (low saturation, bright) around them
    m = ndimage.binary_fill_holes(np.asarray(m) & ((hsv[..., 1] > 38) | (hsv[..., 2] < 100)))
    m = Image.fromarray(ndimage.binary_opening(m, iterations=2).astype(np.uint8) * 255)
    ImageDraw.Draw(m).polygon([(10, 502), (15, 330), (55, 250), (120, 210), (280, 210), (335, 270),
                               (355, 360), (360, 502)], fill=255)
    out["person"] = (person, _soft(m, 2))
    plant = Image.new("RGB", (300, 430), (176, 88, 48))  # terracotta pot under the dahlia
    m = Image.new("L", plant.size)
    d, dp = ImageDraw.Draw(m), ImageDraw.Draw(plant)
    dp.rectangle((30, 262, 270, 292), fill=(194, 100, 58))  # the rim
    d.polygon([(40, 262), (260, 262), (230, 430), (70, 430)], fill=255)
    d.rectangle((30, 262, 270, 292), fill=255)
    # a round pot is lit from the front: darker towards its sides
    shade = 0.6 + 0.45 * np.sin(np.linspace(0.1, np.pi - 0.1, plant.width, dtype=np.float32))
    plant = Image.fromarray(np.clip(np.asarray(plant) * shade[None, :, None], 0, 255).astype(np.uint8))
    head = Image.new("L", plant.size)
    ImageDraw.Draw(head).ellipse((20, 10, 280, 264), fill=255)
    dahlia = _photo("flower").crop((160, 78, 455, 368)).resize((280, 280))
    plant.paste(dahlia, (10, 0), head.crop((10, 0, 290, 280)))
    m.paste(head, (0, 0), head)
    out["pottedplant"] = (plant, _soft(m, 3))
    horse = np.asarray(_photo("horse").convert("L")) < 128  # skimage's horse: True is the background
    out["horse_mask"] = _soft(Image.fromarray((horse * 255).astype(np.uint8)), 2)
    return out


def _horse(rng: np.random.Generator, src: dict) -> tuple[Image.Image, Image.Image]:
    """The silhouette filled with a random patch of cat fur, recoloured, darker towards the belly."""
    mask = src["horse_mask"]
    fur = src["fur"]
    x, y = rng.integers(0, fur.width - 100), rng.integers(0, fur.height - 80)
    tex = np.asarray(fur.resize(mask.size, box=(x, y, x + 100, y + 80)), np.float32)
    tex = 1 + 0.6 * (tex / tex.mean() - 1)  # a horse's coat has less contrast than a tabby's stripes
    coat = rng.choice([(120, 70, 35), (150, 90, 45), (60, 40, 30), (185, 170, 150), (90, 60, 40)])
    shade = np.linspace(1.15, 0.8, mask.height, dtype=np.float32)[:, None]
    rgb = np.clip(tex[..., None] * shade[..., None] * np.array(coat, np.float32), 0, 255)
    return Image.fromarray(rgb.astype(np.uint8)), mask


def _tvmonitor(rng: np.random.Generator, src: dict) -> tuple[Image.Image, Image.Image]:
    """A dark bezel (and, mostly, a stand) around a crop of another photo."""
    w, h = 240, int(240 / rng.uniform(1.2, 1.8))
    stand = rng.random() < 0.6
    total_h = h + (int(0.2 * h) if stand else 0)
    grey = int(rng.integers(15, 70))
    rgb = Image.new("RGB", (w, total_h), (grey, grey, grey + 5))
    m = Image.new("L", rgb.size)
    d, dm = ImageDraw.Draw(rgb), ImageDraw.Draw(m)
    dm.rectangle((0, 0, w - 1, h - 1), fill=255)
    if stand:
        foot = [(w // 2 - 18, h), (w // 2 + 18, h), (w // 2 + 40, total_h - 1), (w // 2 - 40, total_h - 1)]
        dm.polygon(foot, fill=255)
        d.polygon(foot, fill=(grey + 20,) * 3)
    b = int(w * rng.uniform(0.04, 0.09))
    screen = src["screen"]
    sw = int(rng.integers(screen.width // 4, screen.width // 2))
    sx, sy = int(rng.integers(0, screen.width - sw)), int(rng.integers(0, screen.height - sw * h // w))
    rgb.paste(screen.resize((w - 2 * b, h - 2 * b), box=(sx, sy, sx + sw, sy + sw * h // w)), (b, b))
    return rgb, _soft(m, 1.5)


def instance(cls: str, rng: np.random.Generator, long_side_px: int) -> tuple[np.ndarray, np.ndarray]:
    """One object of class cls, its longer side about long_side_px -> RGB (h, w, 3) float32 in 0..255 and
    alpha (h, w) float32 in 0..1: crop, aspect, flip, rotation and colour vary per instance."""
    src = _sources()
    makers = {"horse": _horse, "tvmonitor": _tvmonitor}  # drawn per instance; the others are fixed templates
    rgb, alpha = makers[cls](rng, src) if cls in makers else src[cls]
    w, h = rgb.size
    # crop jitter for the photo crops, which are framed arbitrarily anyway; cutting into a silhouette, a pot
    # or a bezel would leave a straight edge that no real object has
    jitter = 0.06 if cls in ("cat", "person") else 0.0
    box = tuple(float(v) for v in np.array([0, 0, w, h]) + rng.uniform(0, jitter, 4) * [w, h, -w, -h])
    aspect = float(np.exp(rng.uniform(-0.2, 0.2)))
    scale = long_side_px / max(w * aspect, h)
    size = (max(4, round(w * aspect * scale)), max(4, round(h * scale)))
    rgb, alpha = rgb.resize(size, Image.BILINEAR, box=box), alpha.resize(size, Image.BILINEAR, box=box)
    if rng.random() < 0.5:
        rgb, alpha = rgb.transpose(Image.FLIP_LEFT_RIGHT), alpha.transpose(Image.FLIP_LEFT_RIGHT)
    angle = float(rng.uniform(-10, 10))
    rgb = rgb.rotate(angle, Image.BILINEAR, expand=True)
    alpha = _soft(alpha.rotate(angle, Image.BILINEAR, expand=True), 0.7)
    # colour jitter: brightness, contrast, white balance
    out = np.asarray(rgb, np.float32)
    mean = out.mean()
    out = (out - mean) * rng.uniform(0.75, 1.25) + mean * rng.uniform(0.7, 1.3)
    out = np.clip(out * rng.uniform(0.9, 1.1, 3).astype(np.float32), 0, 255)
    return out, np.asarray(alpha, np.float32) / 255.0


def background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A random crop of a random photo, resized to (height, width, 3) float32, flipped, tinted."""
    photos = _sources()["backgrounds"]
    photo = photos[int(rng.integers(len(photos)))]
    fit = min(photo.width / width, photo.height / height)
    cw = width * fit * rng.uniform(0.5, 1.0)  # not so close that the photo turns to blur
    ch = cw * height / width
    x, y = rng.uniform(0, photo.width - cw), rng.uniform(0, photo.height - ch)
    img = photo.resize((width, height), Image.BILINEAR, box=(x, y, x + cw, y + ch))
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(img, np.float32) * rng.uniform(0.8, 1.15, 3).astype(np.float32)
