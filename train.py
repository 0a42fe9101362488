"""Train a teacher or distill a student: `python train.py experiment=soft` (see README.md)."""

from kd_lightning.train import main

if __name__ == "__main__":
    main()
