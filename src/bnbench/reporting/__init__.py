"""The report: statistics, figures and the HTML page, from rows alone (never from training code)."""
