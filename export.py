"""Export a trained net (ONNX, TorchScript), verified: `python export.py ckpt_path=<checkpoint>` (see docs/export.md)."""

from kd_lightning.export import main

if __name__ == "__main__":
    main()
