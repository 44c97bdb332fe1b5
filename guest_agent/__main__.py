from guest_agent.cli import main

main()
