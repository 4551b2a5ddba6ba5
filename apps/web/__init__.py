"""The web demo's page (plain HTML, JS and CSS, no build step), served by `odlora serve`; see runtime/webapp.py."""
