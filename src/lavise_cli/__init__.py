"""lavise-cli: explain what the filters of a convolutional network have learned, in words.

An implementation of LaViSE (Yang et al., CVPR 2022).  The command line (``lavise``) is a thin
shell over the functions re-exported here, so that a notebook can do everything it does.
"""

__version__ = "0.1.0"
