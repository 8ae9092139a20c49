"""Test and benchmark utilities shipped with the package: AOT compile reports, interpreter bytes-moved counter."""
