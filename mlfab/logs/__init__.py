"""What is logged (internal): value types, the lazy buffer, media rendering and conversion of `log_*` arguments."""
