"""`python -m kd_fracture.explain`: Grad-CAM overlays — the command lives in kd_fracture.cli.explain."""
from kd_fracture.cli.explain import main

if __name__ == "__main__":
    raise SystemExit(main())
