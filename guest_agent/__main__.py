from guest_agent.cli import run

run()
