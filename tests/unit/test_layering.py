"""Imports point one way: the package reads as the data path (README "Layout"); no module imports a later stage."""

import ast

from helpers import REPO

# A package may import only packages of a lower rank.
RANK = {
    "errors": 0,
    "seeding": 1,
    "config": 1,
    "data": 2,
    "models": 3,
    "prep": 4,  # raw data -> shards (uses data's format and models' text encoder)
    "diffusion": 4,
    "checkpoint": 5,
    "training": 6,
    "vae": 7,  # the first stage's job: raw images through prep/, the U-Net job's callbacks and metrics
    "launch": 8,
    "sample": 9,
    "export": 9,
    "evaluate": 10,  # samples through sample/, reads reference images through prep/
    "demo": 11,
    "train": 12,  # the `python -m sdtrain.train` entry point
    "train_vae": 12,
}


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sdtrain."):
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("sdtrain."))


def test_no_package_imports_a_later_stage():
    wrong = []
    for path in sorted((REPO / "sdtrain").rglob("*.py")):
        parts = path.relative_to(REPO / "sdtrain").with_suffix("").parts
        own = parts[0]
        if own == "__init__":
            continue
        assert own in RANK, f"{own} has no place in RANK (add the new package to the layering)"
        for module in _imports(path):
            target = module.split(".")[1]
            if target != own and RANK[target] >= RANK[own]:
                wrong.append(f"{path.relative_to(REPO)} imports {module}")
    assert not wrong, wrong
