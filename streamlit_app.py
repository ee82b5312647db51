"""obatch UI from a checkout: `streamlit run streamlit_app.py` (or `obatch ui`, which runs the packaged app).

The app and its pages ship in the package (obatch/ui/app.py, obatch/ui/pages/); this file and pages/ run them.
"""

from obatch.ui.app import main

main()
