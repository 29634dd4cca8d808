"""The steps of bench/gpu_check.sh, one module each, run as ``python -m bench.gpu_steps.<step>``.

Each step module declares ``MODULES``: every top-level module it imports when it runs, the lazy
imports inside the product code included (diffusers, pydantic_settings, cachetools, webrtcvad...).
The preflight imports exactly these on the lent machine; tests/test_device_kit.py proves here that
the lists are complete and that the lent machine's packages (lent_machine.txt) plus the kit's
wheels (kit.txt) provide them.
"""
