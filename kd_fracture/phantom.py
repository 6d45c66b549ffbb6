"""`python -m kd_fracture.phantom`: write a synthetic phantom dataset — the command lives in kd_fracture.cli.phantom."""
from kd_fracture.cli.phantom import main

if __name__ == "__main__":
    raise SystemExit(main())
