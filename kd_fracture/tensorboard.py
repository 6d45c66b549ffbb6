"""`python -m kd_fracture.tensorboard`: TensorBoard over a runs root — the command lives in kd_fracture.cli.tensorboard."""
from kd_fracture.cli.tensorboard import main

if __name__ == "__main__":
    raise SystemExit(main())
