"""OpenRLHF integration: the only part of openrlhf_passk that touches OpenRLHF internals.

`bootstrap` (imported by the installed `openrlhf_passk_hook.pth`) registers lazy post-import hooks;
`hooks` patches OpenRLHF modules as they are imported; `config` holds our command-line flags and their
validation; `experience` the experience-maker patch; `upstream` names every upstream symbol we touch.
This file stays empty so that the bootstrap import is cheap.
"""
