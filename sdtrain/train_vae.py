"""`python -m sdtrain.train_vae` / `sdtrain-train-vae`: the first stage's entry point (in launch/train_vae.py)."""

from sdtrain.training import signals

signals.install()  # before the heavy imports below: a SLURM warning signal must never kill a starting job


def main() -> None:
    from sdtrain.launch.train_vae import main as hydra_main

    hydra_main()


if __name__ == "__main__":
    main()
