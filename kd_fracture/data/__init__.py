"""Data: manifest loaders (MURA v1.1, folder layout), synthetic phantom, folds, dataset and transforms."""
