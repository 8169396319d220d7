"""`python -m sdtrain.train ...` / `sdtrain-train`: the documented entry point (code in sdtrain/launch/train.py)."""

from sdtrain.training import signals

signals.install()  # before the heavy imports below: a SLURM warning signal must never kill a starting job


def main() -> None:
    from sdtrain.launch.train import main as hydra_main

    hydra_main()


if __name__ == "__main__":
    main()
