"""When the night runs: an APScheduler 3.x cron job, kept in memory, caught up from the database's record of nights."""
