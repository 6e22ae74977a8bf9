"""Where the course lives on GitHub, written once: the Colab badges and the setup cells' pip line.

A notebook's setup cell cannot import this module before the package is installed, so each one
spells out `PIP_SPEC` itself; tests/test_repo.py checks that every setup cell, every notebook's
badge and the README's course map agree with the values here. Working from a fork? Change `REPO`,
then the setup cells and badges (the test lists every place that disagrees).
"""
REPO = "moe-lab/moe-lab"  # GitHub owner/name of the course (a placeholder until it is published)
BRANCH = "main"  # the branch Colab opens notebooks from
PIP_SPEC = f"moe-lab @ git+https://github.com/{REPO}"  # what the setup cell installs on Colab: no [lab] extra (Colab has its own Jupyter)
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"


def notebook_url(path: str) -> str:
    """Colab's address of a notebook in the repository, e.g. notebook_url("notebooks/00_setup.ipynb")."""
    return f"https://colab.research.google.com/github/{REPO}/blob/{BRANCH}/{path}"


def badge(path: str) -> str:
    """The markdown "Open in Colab" badge of a notebook in the repository."""
    return f"[![Open In Colab]({BADGE_IMAGE})]({notebook_url(path)})"
