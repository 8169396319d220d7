# Makes conf/ the package `sdtrain.conf` once installed (pyproject maps it there), so Hydra finds it through the
# package (pkg://sdtrain.conf) from any working directory.
