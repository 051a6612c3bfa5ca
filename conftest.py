"""pytest configuration shared by the unit tests and the notebooks run under nbval."""
import os

# Progress bars are for people; keep test logs (and notebook kernels started by nbval) quiet.
os.environ.setdefault("PEFTTUTOR_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
