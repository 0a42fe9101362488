"""Classify images with a trained net: `python predict.py ckpt_path=<best.ckpt or .onnx> input=<file or folder>`
(see docs/own-data.md#predict)."""

from kd_lightning.predict import main

if __name__ == "__main__":
    main()
