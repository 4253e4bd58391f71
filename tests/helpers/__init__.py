"""Shared helpers of the test suite (not tests, not collected): modules that several test files import, such as
a local HTTP server, synthetic passports and DICOM series, and the numbered scripts loaded as modules. Test files
import them as ``helpers.<module>`` (pytest puts tests/ on sys.path, as conftest.py's folder); shared fixtures
live in tests/conftest.py, and no test file imports another test file."""
