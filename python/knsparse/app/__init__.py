"""The app on top of the library: commands of the CLI. May import anything; nothing in the
library imports it."""
