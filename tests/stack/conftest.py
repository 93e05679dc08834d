def pytest_configure(config):
    config.addinivalue_line("markers", "stack: needs the running services of deploy/stack.sh (tests/stack/run.sh)")
