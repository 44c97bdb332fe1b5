from guest_agent.main import run

run()
