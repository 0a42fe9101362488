"""Test a saved net on the test split: `python eval.py ckpt_path=<checkpoint>` (see README.md)."""

from kd_lightning.eval import main

if __name__ == "__main__":
    main()
