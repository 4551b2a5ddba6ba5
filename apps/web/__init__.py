"""The web demo: its page (plain HTML, JS and CSS, no build step) and `app.py`, the routes and
personalisation jobs that `odlora serve` adds to the OpenAI API (see app.py)."""
