"""Pass@k Training for OpenRLHF.

Flow: tasks (maze) -> rewards (reward_func file, HTTP server) -> advantages (registry)
-> integration (OpenRLHF patches) -> ops (scripts/, docker/, k8s/).
This module stays import-light: the `.pth` bootstrap imports it at interpreter start.
"""

__version__ = "0.1.0"
