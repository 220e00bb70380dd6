"""atheris fuzz targets for imkit's wire layer and sessions; see README.rst here."""
