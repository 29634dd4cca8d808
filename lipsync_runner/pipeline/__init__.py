"""One job: plan, then execute (job.py); the frame store, avatar cache and scratch-disk ledger it uses."""
