# One image for every Harbor service: `harbor serve allocator|registry|worker`.
FROM node:20-bookworm-slim AS build
WORKDIR /harbor
COPY package.json package-lock.json .npmrc turbo.json tsconfig.base.json buf.yaml ./
COPY proto ./proto
COPY libs ./libs
COPY services ./services
COPY test/e2e/package.json ./test/e2e/package.json
RUN npm ci --no-fund --no-audit && npm run build && npm prune --omit=dev

FROM node:20-bookworm-slim
WORKDIR /harbor
ENV NODE_ENV=production
COPY --from=build /harbor /harbor
ENTRYPOINT ["node", "/harbor/services/cli/bin/harbor.js"]
CMD ["serve", "all"]
