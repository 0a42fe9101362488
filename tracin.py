"""TracIn influence of a student and its teacher, compared: `python tracin.py student_run=<run dir>` (see docs/influence.md)."""

from kd_lightning.influence.cli import main

if __name__ == "__main__":
    main()
