"""`python -m kd_fracture.distill`: distillation with an Optuna search — the command lives in kd_fracture.cli.distill."""
from kd_fracture.cli.distill import main

if __name__ == "__main__":
    raise SystemExit(main())
