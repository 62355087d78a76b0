"""Model sizes as short strings: 'B/16' for a ViT, 'B' for a text tower.

ViT sizes follow ViT / big_vision (except 'mu', a tiny size for tests and CPU);
text sizes follow CLIP's text towers ('B' = OpenAI CLIP's 512-wide text tower).
"""

from typing import Mapping, Optional

# name: (width, depth, heads, mlp_dim)
VIT_SIZES = {
    "mu": (64, 2, 2, 256),
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (768, 12, 12, 3072),
    "L": (1024, 24, 16, 4096),
}
TEXT_SIZES = {
    "mu": (64, 2, 2, 256),
    "Ti": (192, 12, 3, 768),
    "S": (384, 12, 6, 1536),
    "B": (512, 12, 8, 2048),
    "L": (768, 12, 12, 3072),
}
OVERRIDABLE = ("width", "depth", "heads", "mlp_dim")


def parse_variant(variant: str, overrides: Optional[Mapping] = None, kind: str = "image") -> dict:
    """'B/16' -> dict(width=768, depth=12, heads=12, mlp_dim=3072, patch=16).

    Args:
      variant: 'name/patch' for kind='image' (e.g. 'mu/8', 'L/14'); 'name' for
        kind='text' (patch is then None).
      overrides: optional mapping with any of width/depth/heads/mlp_dim; entries
        that are None are ignored (so a config can list them all as None).
      kind: 'image' (ViT sizes) or 'text' (CLIP text-tower sizes).
    Raises:
      ValueError naming the valid choices for an unknown size, a missing or bad
      patch, or an unknown override key.
    """
    tables = {"image": VIT_SIZES, "text": TEXT_SIZES}
    if kind not in tables:
        raise ValueError(f"kind must be one of {sorted(tables)}, got {kind!r}.")
    table = tables[kind]
    name, _, patch = str(variant).partition("/")
    if name not in table:
        raise ValueError(
            f"unknown {kind} variant {variant!r}: size must be one of "
            f"{list(table)}" + (" followed by '/patch', e.g. 'B/16'." if kind == "image" else ", e.g. 'B'.")
        )
    if kind == "image":
        if not patch.isdigit() or int(patch) <= 0:
            raise ValueError(
                f"image variant {variant!r} needs a positive patch size after the slash, e.g. '{name}/16'."
            )
        patch = int(patch)
    elif patch:
        raise ValueError(f"text variant {variant!r} takes no patch; use e.g. {name!r}.")
    else:
        patch = None
    width, depth, heads, mlp_dim = table[name]
    out = dict(width=width, depth=depth, heads=heads, mlp_dim=mlp_dim, patch=patch)
    for key, value in dict(overrides or {}).items():
        if key not in OVERRIDABLE:
            raise ValueError(f"unknown override {key!r} for variant {variant!r}; valid keys: {list(OVERRIDABLE)}.")
        if value is not None:
            out[key] = int(value)
    if out["width"] % out["heads"]:
        raise ValueError(
            f"variant {variant!r} with overrides {dict(overrides or {})}: "
            f"width {out['width']} is not divisible by heads {out['heads']}."
        )
    return out
