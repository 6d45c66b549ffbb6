"""`python -m kd_fracture.manifest`: load, validate and summarise a dataset — the command lives in kd_fracture.cli.manifest."""
from kd_fracture.cli.manifest import main

if __name__ == "__main__":
    raise SystemExit(main())
