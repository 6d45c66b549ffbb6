"""`python -m kd_fracture.pretrain`: build the phantom domain-pretrained weights — the command lives in kd_fracture.cli.pretrain."""
from kd_fracture.cli.pretrain import main

if __name__ == "__main__":
    raise SystemExit(main())
