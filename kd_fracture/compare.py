"""`python -m kd_fracture.compare`: compare finished runs — the command lives in kd_fracture.cli.compare."""
from kd_fracture.cli.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
