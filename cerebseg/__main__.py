"""``python -m cerebseg`` runs the BIDS-App."""
from cerebseg.bids_app.run import main

if __name__ == '__main__':
    raise SystemExit(main())
