"""Around the jobs: webhooks, idempotency keys, usage accounting, URL-input policy (SQLite or PostgreSQL)."""
