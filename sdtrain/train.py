"""`python -m sdtrain.train ...`: the documented entry point; the code lives in sdtrain/launch/train.py."""

from sdtrain.launch.train import main

if __name__ == "__main__":
    main()
