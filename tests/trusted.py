"""The --trusted-root that the tests' search and serve commands pass: every index and image folder the tests make
lies under the temporary folder (pytest's base folder is inside it), which stands for the folder an operator
trusts. Without it the default, the working folder (the repository), would refuse them (inference/index.py)."""
import tempfile

TRUSTED = ["--trusted-root", tempfile.gettempdir()]
