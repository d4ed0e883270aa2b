"""When the night runs: an APScheduler 3.x cron job persisted in nightowl's own database."""
