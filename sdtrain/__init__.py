"""sdtrain: train Stable Diffusion's latent U-Net on pre-encoded WebDataset shards.

The package reads in the order data flows: prep -> data -> models -> diffusion -> training -> launch -> sample.
A module only imports packages to its left (plus `errors` and `config`).
"""

__version__ = "0.1.0"
