"""Tank as an ASGI application: mount it in Starlette or FastAPI, or run it alone under uvicorn
or hypercorn (asyncio or trio). See docs/how-to/asgi.md.

    from tank_asgi import TankASGI

    tank = TankASGI(authenticate=check_token, http=True)
    app = FastAPI(lifespan=tank.lifespan)
    app.mount("/tank", tank)
"""

from ._app import AsgiUpgradeRequest, TankASGI

__all__ = ["AsgiUpgradeRequest", "TankASGI"]
