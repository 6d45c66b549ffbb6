"""`python -m kd_fracture.predict`: score images with a run's models — the command lives in kd_fracture.cli.predict."""
from kd_fracture.cli.predict import main

if __name__ == "__main__":
    raise SystemExit(main())
