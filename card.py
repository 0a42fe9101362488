"""Teacher vs student model card: `python card.py student_run=<run dir>` (see docs/export.md)."""

from kd_lightning.card import main

if __name__ == "__main__":
    main()
