"""`python -m kd_fracture.app`: the local web app — the command lives in kd_fracture.cli.app."""
from kd_fracture.cli.app import main

raise SystemExit(main())
