"""`python -m kd_fracture.app --run RUN`: a local, offline web app — upload the radiographs of one study, see the
teacher fold ensemble's and the distilled student's probabilities, decisions and Grad-CAM overlays, and browse the
runs under the runs root (their headline numbers and report.html pages).

The FastAPI application lives in `kd_fracture.app.server` (`create_app`); the command in `kd_fracture.cli.app`.
Nothing is imported here, so `--help` works without the `app` extra (pip install 'kd_fracture[app]').
"""
