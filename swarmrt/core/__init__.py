"""Pure core: no network, process or clock code. Time and randomness are passed in."""
