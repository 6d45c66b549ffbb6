"""`python -m kd_fracture.evaluate`: judge a run's models on another dataset — the command lives in kd_fracture.cli.evaluate."""
from kd_fracture.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
